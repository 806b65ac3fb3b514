"""clip-atlas dashboard: `streamlit run dashboard/app.py -- --store artifacts`."""
import streamlit as st

st.set_page_config(page_title="clip-atlas", page_icon=":material/hub:", layout="wide")

pages = {
    "Overview": [
        st.Page("pages/leaderboard.py", title="Leaderboard", icon=":material/leaderboard:", default=True),
        st.Page("pages/atlas.py", title="Head atlas", icon=":material/grid_view:"),
    ],
    "Analyses": [
        st.Page("pages/property_search.py", title="Property search", icon=":material/category:"),
        st.Page("pages/topic_segmentation.py", title="Topic segmentation", icon=":material/layers:"),
        st.Page("pages/contrastive.py", title="Contrastive segmentation", icon=":material/compare:"),
        st.Page("pages/image_neighbours.py", title="Image neighbours", icon=":material/image_search:"),
        st.Page("pages/text_neighbours.py", title="Text neighbours", icon=":material/manage_search:"),
    ],
}
st.navigation(pages).run()
