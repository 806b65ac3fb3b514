"""clip-atlas dashboard: `streamlit run dashboard/app.py -- --store artifacts`."""
import streamlit as st

# The page scripts live in views/, not pages/: a pages/ folder beside this file makes Streamlit
# start in its legacy multipage mode, where a first visit to a page URL bypasses st.navigation.

st.set_page_config(page_title="clip-atlas", page_icon=":material/hub:", layout="wide")

pages = {
    "Overview": [
        st.Page("views/leaderboard.py", title="Leaderboard", icon=":material/leaderboard:", default=True),
        st.Page("views/compare.py", title="Compare models", icon=":material/compare_arrows:"),
        st.Page("views/atlas.py", title="Head atlas", icon=":material/grid_view:"),
        st.Page("views/head.py", title="Head", icon=":material/center_focus_strong:"),
    ],
    "Analyses": [
        st.Page("views/property_search.py", title="Property search", icon=":material/category:"),
        st.Page("views/topic_segmentation.py", title="Topic segmentation", icon=":material/layers:"),
        st.Page("views/contrastive.py", title="Contrastive segmentation", icon=":material/compare:"),
        st.Page("views/describe.py", title="Describe an image", icon=":material/description:"),
        st.Page("views/intervene.py", title="Intervene", icon=":material/content_cut:"),
        st.Page("views/image_neighbours.py", title="Image neighbours", icon=":material/image_search:"),
        st.Page("views/text_neighbours.py", title="Text neighbours", icon=":material/manage_search:"),
        st.Page("views/neurons.py", title="Neurons", icon=":material/neurology:"),
    ],
}
st.navigation(pages).run()
